"""`python -m nanoswarm.cli`: the same as the `nanoswarm` command (and `python -m nanoswarm`)."""

from nanoswarm.cli import main

main()
