"""Imported last by the peers' fork server (launch.py), after torch and transformers: `gc.freeze()` moves every
object imported so far out of the cyclic garbage collector's reach, so a forked peer's collections neither scan
those hundreds of thousands of objects nor touch (and so copy) the pages they live on. Then the collector, paused
for the imports by preload_start.py, runs again (the peers inherit it running)."""
import gc

gc.freeze()
gc.enable()
