"""What crosses organisations: the site policy, the typed channel, the site agent.

Each site runs its own Ray cluster and decides from its own files what it does; the
coordinator reaches it only through the channel (see docs/tutorials/cross-org.md and
docs/federation.md).

The channel: the typed message schema (:mod:`.messages`, generated ``federation_pb2``)
and the mutual-TLS gRPC transport between a coordinator and the site agents that dial
out to it (:mod:`.channel`); docs/federation.md says what each side calls. Nothing in
this package unpickles, or resolves a class or function from the wire.
"""
