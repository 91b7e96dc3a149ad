"""Running the gateway: the AppRunner/TCPSite, and what happens to a connection before a
request reaches the gateway (admission, header and body timers, descriptor budget)."""
