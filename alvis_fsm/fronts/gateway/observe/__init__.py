"""How the gateway is observed: what requests did, the request log, ``/metrics``, GPU-hours, batches shown."""
