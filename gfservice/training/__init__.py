"""The training process's side: device-side collection (the only torch kernels), the monitor and the senders.

Never imports Ray at module import: the Ray sender loads it only when a service is asked for.
"""
