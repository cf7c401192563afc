"""The one error the secure-aggregation library raises (docs/PROTOCOL.md, "Secure aggregation").

A driver relays bytes between devices it does not trust and a server it may not trust; whatever
those bytes are, and whichever step is taken out of order, it catches one type and reads why.
"""


class SecAggError(ValueError):
    """A refused message, a step out of order or too few devices left; the message says which."""
