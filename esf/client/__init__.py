"""
The client: the engine (L{esf.ClientEngine}), its calls and its inbox, a
blocking wrapper for threads (L{esf.client.blocking}) and the C{esf-client}
command line (L{esf.client.cli}).

It depends on L{esf.wire} and L{esf.interfaces} only, never on the server.
"""
