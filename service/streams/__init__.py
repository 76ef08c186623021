"""What long-lived calls share: stream slots, and the frame every
client-streamed COPY load runs in."""
