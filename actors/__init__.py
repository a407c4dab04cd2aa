"""The children of the tree: engine, health monitor, system server, and (in
later work) the endpoint server, metrics and KV event publishers."""
