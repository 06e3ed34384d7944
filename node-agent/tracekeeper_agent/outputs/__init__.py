"""What loaded programs produce: metrics, the event hub and the console."""
