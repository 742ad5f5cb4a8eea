//! Tests of the merge rules.

use super::*;
