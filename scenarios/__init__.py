"""The buggy handlers: faithful ports of the review snippets, one file each."""
