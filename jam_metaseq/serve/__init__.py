"""``jam serve``: a local web page to talk to a JAM model (issue 25; docs/CONVERSATIONS.md).

- ``app``: the Starlette app (routes, limits, the answer stream) over ``generation.chat``
- ``page``: the page and its script
- ``cli``: ``jam serve CHECKPOINT [--host 127.0.0.1 --port N]`` (uvicorn)

Needs the ``serve`` extra (``pip install 'jam_metaseq[serve]'``).
"""
