"""The bad-input catalog: what kiln does with each kind of wrong input (the list is in conftest.py)."""
