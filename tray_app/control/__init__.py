"""The service both front-ends drive: it puts the layers together, starts and stops them in
one order, and (for the tray) runs them on an asyncio loop in a background thread."""
