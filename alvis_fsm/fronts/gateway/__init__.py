"""`alvis-fsm gateway`: one private OpenAI-compatible endpoint for every
catalog model. ``server.py`` is the HTTP app (aiohttp is imported only by
the app's modules, which only the CLI's ``gateway`` command imports);
``keys.py`` the gateway's own key; ``instance.py`` the running gateway's
entry in the state dir. ``slot/`` is a model's place in the gateway,
``observe/`` how the gateway is seen, ``page/`` the page in the browser,
``openai/`` the OpenAI routes."""
