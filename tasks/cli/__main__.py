"""`python -m tasks.cli`: the `docq` command without its console script."""

from docqueue.tasks.cli import main

main()
