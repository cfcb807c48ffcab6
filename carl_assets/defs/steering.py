"""Assets of this group (filled in by its issue)."""
