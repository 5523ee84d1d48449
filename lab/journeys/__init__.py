"""What ``lab run N`` shows, one module per attack family, and the verdict table they share."""
