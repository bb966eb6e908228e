"""Low-data studies: nested real subsets, generators trained per subset, arms at equal steps."""
