"""`python -m nanoswarm`: the same as the `nanoswarm` command."""

from nanoswarm.cli import main

main()
