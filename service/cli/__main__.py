"""`python -m service.cli`: how the tests and benchmarks start servers."""

from service.cli import main

main()
