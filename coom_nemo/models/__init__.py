"""Model families: configs with a tiny debug size each."""
