"""Byte-stream adapters shared by the relay (``derpd.relay``) and the client (``derpd.client``):
``DrainingSSLStream`` (trio TLS that returns every buffered record per read) and
``WebSocketStream`` (DERP over WebSocket as a plain ``trio.abc.Stream``), and
``PrefixedStream`` (bytes read ahead, handed out again first; the relay's PROXY header check).

Dependencies: this package imports only trio, ssl and wsproto; nothing in ``derpd`` below it.
Both ``derpd.relay`` and ``derpd.client`` import it, so the client never imports the server.
"""
