"""`alvis-fsm gateway`: one private OpenAI-compatible endpoint for every
catalog model (issue 14). ``server.py`` is the HTTP app, ``models.py`` each
model's session and state, ``recorder.py`` what a session reports,
``sessions.py`` how a session is made, ``keys.py`` the gateway's own key,
``instance.py`` the running gateway's entry in the state dir.
aiohttp is imported only by ``server.py``, which only the command imports."""
