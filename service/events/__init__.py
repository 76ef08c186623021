"""EventService: the gap-free event feed, its history and follow streams,
and bulk uploads."""
