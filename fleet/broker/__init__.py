"""The fleet's broker: accounts it manages (accounts.py, dynsec.py) and the local one it
runs when given none (embedded.py)."""
