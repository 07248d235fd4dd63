"""The gated proxy: requests for a managed consumer pass through the boss, which makes room for
the consumer first, keeps it in use while the request runs, streams the answer back and cancels
what the client abandons.

:mod:`.forward` forwards one request; :mod:`.routes` are the routes that pick the consumer: by
name, by kind, or by the OpenAI ``model`` field.
"""
