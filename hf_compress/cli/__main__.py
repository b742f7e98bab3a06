"""`python -m hf_compress.cli ...` is the `hf-compress` command."""

from hf_compress.cli import main

main()
