"""
The server: the engine and its parts, and the transports that feed it.

The engine (L{esf.server._engine.ServerEngine}) never touches a transport:
TCP (L{esf.server._protocol}) and WebSocket (L{esf.server._websocket}) are
thin protocols that hand it frames through a L{esf.interfaces.IChannel}.
Its parts each do one job: sessions and their output, the logon pipeline
and its policy, presence and routing, heartbeats, the server's own
services, the offline path, the memory budget.  Applications import what
they use from L{esf}; see C{docs/server.md} for the map of the modules.
"""
