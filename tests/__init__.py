"""medstream tests (a package, so test modules of different folders never clash by name)."""
