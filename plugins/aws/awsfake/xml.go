package awsfake

import "encoding/xml"

// Namespace is the XML namespace of EC2 API version 2016-11-15 responses.
const Namespace = "http://ec2.amazonaws.com/doc/2016-11-15/"

// APIVersion is the only EC2 API version the fake serves.
const APIVersion = "2016-11-15"

type xmlErrorResponse struct {
	XMLName   xml.Name   `xml:"Response"`
	Errors    []xmlError `xml:"Errors>Error"`
	RequestID string     `xml:"RequestID"`
}

type xmlError struct {
	Code    string `xml:"Code"`
	Message string `xml:"Message"`
}

type xmlState struct {
	Code int    `xml:"code"`
	Name string `xml:"name"`
}

type xmlStateReason struct {
	Code    string `xml:"code"`
	Message string `xml:"message"`
}

type xmlTag struct {
	Key   string `xml:"key"`
	Value string `xml:"value"`
}

type xmlGroup struct {
	GroupID string `xml:"groupId"`
}

type xmlPlacement struct {
	AvailabilityZone string `xml:"availabilityZone"`
	Tenancy          string `xml:"tenancy"`
}

type xmlIAMProfile struct {
	Arn string `xml:"arn"`
	ID  string `xml:"id"`
}

type xmlInstance struct {
	InstanceID            string          `xml:"instanceId"`
	ImageID               string          `xml:"imageId"`
	InstanceState         xmlState        `xml:"instanceState"`
	PrivateDNSName        string          `xml:"privateDnsName"`
	DNSName               string          `xml:"dnsName"`
	Reason                string          `xml:"reason"`
	KeyName               string          `xml:"keyName,omitempty"`
	AmiLaunchIndex        int             `xml:"amiLaunchIndex"`
	InstanceType          string          `xml:"instanceType"`
	LaunchTime            string          `xml:"launchTime"`
	Placement             xmlPlacement    `xml:"placement"`
	Platform              string          `xml:"platform,omitempty"`
	SubnetID              string          `xml:"subnetId,omitempty"`
	VpcID                 string          `xml:"vpcId,omitempty"`
	PrivateIPAddress      string          `xml:"privateIpAddress,omitempty"`
	IPAddress             string          `xml:"ipAddress,omitempty"`
	GroupSet              []xmlGroup      `xml:"groupSet>item"`
	StateReason           *xmlStateReason `xml:"stateReason,omitempty"`
	Architecture          string          `xml:"architecture"`
	RootDeviceType        string          `xml:"rootDeviceType"`
	ClientToken           string          `xml:"clientToken"`
	TagSet                []xmlTag        `xml:"tagSet>item,omitempty"`
	InstanceLifecycle     string          `xml:"instanceLifecycle,omitempty"`
	SpotInstanceRequestID string          `xml:"spotInstanceRequestId,omitempty"`
	IAMInstanceProfile    *xmlIAMProfile  `xml:"iamInstanceProfile,omitempty"`
}

type xmlReservation struct {
	ReservationID string        `xml:"reservationId"`
	OwnerID       string        `xml:"ownerId"`
	GroupSet      []xmlGroup    `xml:"groupSet>item"`
	InstancesSet  []xmlInstance `xml:"instancesSet>item"`
}

type runInstancesResponse struct {
	XMLName       xml.Name      `xml:"RunInstancesResponse"`
	Xmlns         string        `xml:"xmlns,attr"`
	RequestID     string        `xml:"requestId"`
	ReservationID string        `xml:"reservationId"`
	OwnerID       string        `xml:"ownerId"`
	GroupSet      []xmlGroup    `xml:"groupSet>item"`
	InstancesSet  []xmlInstance `xml:"instancesSet>item"`
}

type describeInstancesResponse struct {
	XMLName        xml.Name         `xml:"DescribeInstancesResponse"`
	Xmlns          string           `xml:"xmlns,attr"`
	RequestID      string           `xml:"requestId"`
	ReservationSet []xmlReservation `xml:"reservationSet>item"`
	NextToken      string           `xml:"nextToken,omitempty"`
}

type xmlStateChange struct {
	InstanceID    string   `xml:"instanceId"`
	CurrentState  xmlState `xml:"currentState"`
	PreviousState xmlState `xml:"previousState"`
}

type terminateInstancesResponse struct {
	XMLName      xml.Name         `xml:"TerminateInstancesResponse"`
	Xmlns        string           `xml:"xmlns,attr"`
	RequestID    string           `xml:"requestId"`
	InstancesSet []xmlStateChange `xml:"instancesSet>item"`
}

type getPasswordDataResponse struct {
	XMLName      xml.Name `xml:"GetPasswordDataResponse"`
	Xmlns        string   `xml:"xmlns,attr"`
	RequestID    string   `xml:"requestId"`
	InstanceID   string   `xml:"instanceId"`
	Timestamp    string   `xml:"timestamp"`
	PasswordData string   `xml:"passwordData"`
}

// xmlAttributeValue is EC2's AttributeValue: the value of one attribute.
type xmlAttributeValue struct {
	Value string `xml:"value,omitempty"`
}

type describeInstanceAttributeResponse struct {
	XMLName      xml.Name           `xml:"DescribeInstanceAttributeResponse"`
	Xmlns        string             `xml:"xmlns,attr"`
	RequestID    string             `xml:"requestId"`
	InstanceID   string             `xml:"instanceId"`
	InstanceType *xmlAttributeValue `xml:"instanceType,omitempty"`
	UserData     *xmlAttributeValue `xml:"userData,omitempty"`
}

type getConsoleOutputResponse struct {
	XMLName    xml.Name `xml:"GetConsoleOutputResponse"`
	Xmlns      string   `xml:"xmlns,attr"`
	RequestID  string   `xml:"requestId"`
	InstanceID string   `xml:"instanceId"`
	Timestamp  string   `xml:"timestamp"`
	Output     string   `xml:"output,omitempty"`
}

type importKeyPairResponse struct {
	XMLName        xml.Name `xml:"ImportKeyPairResponse"`
	Xmlns          string   `xml:"xmlns,attr"`
	RequestID      string   `xml:"requestId"`
	KeyFingerprint string   `xml:"keyFingerprint"`
	KeyName        string   `xml:"keyName"`
	KeyPairID      string   `xml:"keyPairId"`
}

type deleteKeyPairResponse struct {
	XMLName   xml.Name `xml:"DeleteKeyPairResponse"`
	Xmlns     string   `xml:"xmlns,attr"`
	RequestID string   `xml:"requestId"`
	Return    bool     `xml:"return"`
	KeyPairID string   `xml:"keyPairId,omitempty"`
}
