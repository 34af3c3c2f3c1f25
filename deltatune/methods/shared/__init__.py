"""What every method family builds on and no method owns: the adapter-layer protocol (`protocol.py`), finding,
replacing and activating layers (`model_surgery.py`), the active/enabled/merged switch layers mix in
(`switch.py`), choosing the modules a method adapts (`targets.py`) and the full copies of modules that train
beside an adapter (`modules_to_save.py`). Nothing here imports a method family or `deltatune.adapters`."""
