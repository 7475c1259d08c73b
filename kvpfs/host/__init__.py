"""The host's side: the `/dev/vmbus/hv_kvp` device (or the simulated host), answering its
requests, the guest's intrinsic values and the network configuration the host reads and sets.
"""
