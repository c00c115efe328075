"""``dcr demo``: DCR on one machine, for trying it out.

``dcr demo`` (``make demo``) generates three demo datasets on its first run -- "real" tables from a seeded
generator and their differentially private synthetic versions, registered with ``dcr provider add`` --,
writes a ``jupyterhub_config.py`` (DCR's local spawner, grant service and policy; JupyterLab with the DCR
server extension), starts the local enclave host and JupyterHub with the real configurable-http-proxy on
127.0.0.1, and prints the URL and the logins. Each researcher finds a sample notebook in their home. One
dataset (the lab results) is released only after review: the provider's reviewer account decides in the hub.

Modules: :mod:`.data` (the generators), :mod:`.notebook` (the sample notebook), :mod:`.prepare` (the demo
directory, registration and configuration), :mod:`.run` (the processes), :mod:`.hub` (the hub-side home
seeder), :mod:`.command` (the ``dcr demo`` command).
"""
