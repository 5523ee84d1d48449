"""One family of attacks per contract: charge (scenarios 1 and 3), herd (2), inbox (4); the provider they
all charge, and the invariants read from the database after every run."""
