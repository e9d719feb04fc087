#![no_std]
// This file exists to enable the library target (gds-user has a build-dependency on it so
// cargo rebuilds the agent when the programs change); the programs live in main.rs.
