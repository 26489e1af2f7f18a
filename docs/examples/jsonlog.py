"""
A log observer factory for C{twistd --logger}: one JSON record per event,
on standard output, with every field of the event (C{esf_event},
C{user_id}, C{reason}, C{duration}, ...) kept machine-readable::

    PYTHONPATH=docs/examples twistd -n --logger=jsonlog.observer esf --port 4530
"""

import sys

from twisted.logger import jsonFileLogObserver


def observer():
    return jsonFileLogObserver(sys.stdout)
