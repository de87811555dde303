"""Reading data files into Records, tag-scheme conversion and grouped validation splits."""
