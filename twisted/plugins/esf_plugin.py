"""
The C{twistd esf} plugin.

This module is imported whenever Twisted scans its plugins, so it names the
service maker and nothing more: L{esf.tap} is imported only when C{twistd esf}
actually runs.
"""

from twisted.application.service import ServiceMaker

esf = ServiceMaker(
    "esf",
    "esf.tap",
    "A server of long-lived, authenticated binary TCP sessions.",
    "esf",
)
