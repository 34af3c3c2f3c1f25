"""Methods made of other methods: `towers` applies one method to each tower of a dual encoder. This package imports
none of its modules."""
