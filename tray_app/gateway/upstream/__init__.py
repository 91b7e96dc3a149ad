"""The LM Studio side: one pooled session, forwarding and SSE relaying, bounded reads of its
answers, usage counting, and the probe of whether it is reachable."""
