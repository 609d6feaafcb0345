"""What crosses organisations: the site policy, the typed channel, the site agent.

Each site runs its own Ray cluster and decides from its own files what it does; the
coordinator reaches it only through the channel (see README, "Across organisations").
"""
