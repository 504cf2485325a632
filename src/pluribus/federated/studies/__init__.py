"""FedBone's studies: the task suites (one task per client), the in-process runner ``run_fedbone`` with its run
folder and result, and the baselines it is compared with (local, FedAvg, FedProx, FedPer, FedRep)."""
