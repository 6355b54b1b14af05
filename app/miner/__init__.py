"""The miner agent: takes assignments from the ledger, runs them with executors, reports back."""
