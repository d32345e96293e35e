"""`minitron`: the command line, the top floor of the house (cli → flows → tasks → minitron).

`cli/main.py` builds the parser; each command lives in `cli/commands/<name>.py`. Nothing below this package imports it.
"""
