//! The commands an operator runs besides the two servers: `backup`, `restore`, `status`
//! (against the cluster) and `review` (one AdmissionReview, offline). Each reads what it
//! needs once or follows it, decides with `policy`, and prints through `report`.

pub mod backup;
pub mod report;
pub mod restore;
pub mod review;
pub mod status;
