"""
The name L{esf.client.blocking} had before the client became a package;
kept so that applications' imports go on working.
"""

from esf.client.blocking import *  # noqa: F403
from esf.client.blocking import __all__  # noqa: F401
