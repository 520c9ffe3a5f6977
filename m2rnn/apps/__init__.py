"""The applications built on the library: the `m2rnn` command line (`cli`), the S3 demo (`demo`), evaluation
(`eval`), conversion (`conversion`), healing (`heal`), publishing (`hub`) and the output-safety rule every command
that writes a folder follows (`output`). They import the library (`m2rnn`); the library never imports them."""
