"""Evaluation: S3 state tracking (`m2rnn.apps.eval.s3`); lm-eval, LongBench and needle-in-a-haystack glue."""
