"""`python -m tasks.cli`: the `docq` command without its console script."""

from tasks.cli import main

main()
