"""Imported first by the peers' fork server (launch.py): pauses the cyclic garbage collector for the imports that
follow. Importing torch and transformers makes hundreds of thousands of objects that all live on, and the collector's
passes over them were 0.7 s of a 4.4 s import here (`python -c "import ..."` three times each way; not a committed
table), all of it before any peer can start. preload_done.py freezes those objects and resumes the collector."""
import gc

gc.disable()
