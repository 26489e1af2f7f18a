"""
The name L{esf.client.cli} had before the client became a package; kept so
that C{python -m esf.cli} goes on working.
"""

from esf.client.cli import main

if __name__ == "__main__":
    main()
