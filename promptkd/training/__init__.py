"""The training side: the run builder (run, builders), the loop (trainer), checkpoints and export
(checkpoint, consolidate), preemption (signals) and the integration tests' fault injection (faults)."""
